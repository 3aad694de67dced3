"""Compiled kernels of the engine: sampling and one recurrent step of a block of streams, and a
prompt, each as a single call that holds no GIL (numba), with the matrix products in
single-threaded BLAS.

Layout (feature-major): every per-stream buffer is a float32 (rows, max_batch) array, one column per
batch slot, passed flattened. A block of streams is a run of columns [b0, b1). Read as column-major,
such a buffer is a (max_batch, rows) matrix with leading dimension max_batch, so the product of a
block's inputs with a weight matrix is one BLAS `sgemm` with M = the block's streams, on any run of
columns without a copy: the orientation in which OpenBLAS runs small batches fastest (the other,
M = the gates, takes 13-25% longer here). The element-wise work runs along contiguous columns,
vectorized across streams.

    S       (L*H, B)  [h_1; ...; h_L]: layer l reads [h_{l-1}; h_l] as one (2H, B) block
    C       (L*H, B)  LSTM cell states (unused by the other cells)
    Z, R    (G, B)    pre-activations; R is the GRU's recurrent product (its reset gate sits inside)
    logits  (V, B)

Weights sit in one float32 blob; `offsets` (int64) says where each piece starts, per layer l:
offsets[l*3 + 0] the (G, K) transposed product matrix (layer 1: U^T with K = H; deeper layers:
[W; U]^T with K = 2H), +1 the bias (G,), +2 the GRU candidate's recurrent bias (H,), and after the
layers: the first layer's input table (G, V) (embedding @ W + b, transposed), the output layer's
(V, H) kernel^T and its bias (V,). Gate order is Keras's own: LSTM i, f, c, o; GRU z, r, h.

tanh is Eigen's (and XLA's) float32 rational approximation, sigmoid(x) = (1 + tanh(x / 2)) / 2: both
vectorize, unlike a call to expf. Measured against float64 over [-20, 20]: tanh within 3.1e-7
(relative), sigmoid within 1.8e-7 (absolute), a few float32 ulps of 1.
"""

from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numba as nb
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS whose addresses are taken below)
from numba import types
from numba.extending import get_cython_function_address

from model.sampling import pick

LSTM, GRU, RNN = 0, 1, 2
CELL_CODES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
PER_LAYER = 3  # entries of `offsets` per layer

# Fortran BLAS through scipy's cython_blas: symbols registered by name, so compiled code caches.
llvm.add_symbol("chargen_sgemm", get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
llvm.add_symbol("chargen_sgemv", get_cython_function_address("scipy.linalg.cython_blas", "sgemv"))
_sgemm = types.ExternalFunction("chargen_sgemm", types.void(*[types.voidptr] * 13))
_sgemv = types.ExternalFunction("chargen_sgemv", types.void(*[types.voidptr] * 11))
llvm.add_symbol("chargen_sched_yield", ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value)
_sched_yield = types.ExternalFunction("chargen_sched_yield", types.intc())

F = np.float32
_jit = nb.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
_inline = nb.njit(inline="always", fastmath=True, error_model="numpy")


# ---------------------------------------------------------------- activations


@_inline
def tanh(x):
    x = min(max(x, F(-7.90531110763549805)), F(7.90531110763549805))  # tanh is +-1 in float32 beyond
    x2 = x * x
    p = x2 * F(-2.76076847742355e-16) + F(2.00018790482477e-13)
    p = p * x2 + F(-8.60467152213735e-11)
    p = p * x2 + F(5.12229709037114e-08)
    p = p * x2 + F(1.48572235717979e-05)
    p = p * x2 + F(6.37261928875436e-04)
    p = p * x2 + F(4.89352455891786e-03)
    q = x2 * F(1.19825839466702e-06) + F(1.18534705686654e-04)
    q = q * x2 + F(2.26843463243900e-03)
    q = q * x2 + F(4.89352518554385e-03)
    return x * p / q


@_inline
def sigmoid(x):
    return F(0.5) + F(0.5) * tanh(F(0.5) * x)


# ---------------------------------------------------------------- products


@_jit
def product(n, k, g, x, x_off, ldx, w, w_off, ldw, beta, z, z_off, ldz):
    """Column-major z[n, g] = x[n, k] @ w[k, g] + beta * z: for a block of n streams, out = inputs @ W
    where inputs and out are (rows, B) buffers read from column x_off / z_off, and w is a (g, k)
    row-major W^T at w_off. One stream uses gemv (BLAS's gemm is slow at M = 1)."""
    ints = np.array([n, g, k, ldx, ldw, ldz, 1], np.int32)
    scalars = np.array([1.0, beta], np.float32)
    if n == 1:  # z = w^T-as-column-major(k, g)^T x, with x and z strided by their leading dimensions
        trans = np.array([84], np.uint8)  # 'T'
        _sgemv(trans.ctypes, ints[2:].ctypes, ints[1:].ctypes, scalars.ctypes, w[w_off:].ctypes, ints[4:].ctypes,
               x[x_off:].ctypes, ints[3:].ctypes, scalars[1:].ctypes, z[z_off:].ctypes, ints[5:].ctypes)
    else:
        trans = np.array([78], np.uint8)  # 'N'
        _sgemm(trans.ctypes, trans.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, scalars.ctypes,
               x[x_off:].ctypes, ints[3:].ctypes, w[w_off:].ctypes, ints[4:].ctypes, scalars[1:].ctypes,
               z[z_off:].ctypes, ints[5:].ctypes)


# ---------------------------------------------------------------- cells on a block of columns


@_inline
def row(A, r, B, b0, b1):
    """Columns b0..b1 of row r of a flattened (rows, B) buffer."""
    return A[r * B + b0 : r * B + b1]


# Rows are taken as slices: numba then knows the indices are in range and not negative, and the
# loops over streams vectorize (indexing with computed offsets left them scalar, 6x slower).


@_jit
def lstm_cells(Z, C, S, H, B, layer, b0, b1):
    for j in range(H):
        i, f, g, o = row(Z, j, B, b0, b1), row(Z, H + j, B, b0, b1), row(Z, 2 * H + j, B, b0, b1), row(Z, 3 * H + j, B, b0, b1)
        c, h = row(C, layer * H + j, B, b0, b1), row(S, layer * H + j, B, b0, b1)
        for b in range(b1 - b0):
            cb = sigmoid(f[b]) * c[b] + sigmoid(i[b]) * tanh(g[b])
            c[b] = cb
            h[b] = sigmoid(o[b]) * tanh(cb)


@_jit
def gru_cells(Z, R, S, blob, candidate_bias, H, B, layer, b0, b1):
    """Keras GRU, reset_after=True: z, r = sigmoid(x W + h U + biases),
    candidate = tanh(x W_h + b_h + r * (h U_h + b_rec_h)), h = z * h + (1 - z) * candidate."""
    for j in range(H):
        xz, xr, xh = row(Z, j, B, b0, b1), row(Z, H + j, B, b0, b1), row(Z, 2 * H + j, B, b0, b1)
        hz, hr, hh = row(R, j, B, b0, b1), row(R, H + j, B, b0, b1), row(R, 2 * H + j, B, b0, b1)
        h = row(S, layer * H + j, B, b0, b1)
        rb = blob[candidate_bias + j]
        for b in range(b1 - b0):
            z = sigmoid(xz[b] + hz[b])
            r = sigmoid(xr[b] + hr[b])
            candidate = tanh(xh[b] + r * (hh[b] + rb))
            h[b] = candidate + z * (h[b] - candidate)


@_jit
def rnn_cells(Z, S, H, B, layer, b0, b1):
    for j in range(H):
        z, h = row(Z, j, B, b0, b1), row(S, layer * H + j, B, b0, b1)
        for b in range(b1 - b0):
            h[b] = tanh(z[b])


@_jit
def fill(Z, rows, B, blob, bias, b0, b1):
    """Z[r, b0:b1] = blob[bias + r]."""
    for r in range(rows):
        row(Z, r, B, b0, b1)[:] = blob[bias + r]


@_inline
def gates_of(cell):
    return 4 if cell == LSTM else (3 if cell == GRU else 1)


@_jit
def layer_step(cell, layer, H, B, b0, b1, blob, offsets, S, C, Z, R):
    """Advance `layer` of streams b0..b1, whose input projection (with its bias) is already in Z for
    the first layer, or whose input h_{layer-1} is already updated in S for deeper ones."""
    n, G = b1 - b0, gates_of(cell) * H
    w, bias = offsets[layer * PER_LAYER], offsets[layer * PER_LAYER + 1]
    h = layer * H * B  # h_layer in S
    if cell == GRU:
        if layer > 0:  # Z = h_{layer-1} W + b; R = h_layer U
            fill(Z, G, B, blob, bias, b0, b1)
            product(n, H, G, S, h - H * B + b0, B, blob, w, 2 * H, 1.0, Z, b0, B)
            product(n, H, G, S, h + b0, B, blob, w + H, 2 * H, 0.0, R, b0, B)
        else:
            product(n, H, G, S, h + b0, B, blob, w, H, 0.0, R, b0, B)
        gru_cells(Z, R, S, blob, offsets[layer * PER_LAYER + 2], H, B, layer, b0, b1)
        return
    if layer > 0:  # Z = [h_{layer-1}; h_layer] [W; U] + b
        fill(Z, G, B, blob, bias, b0, b1)
        product(n, 2 * H, G, S, h - H * B + b0, B, blob, w, 2 * H, 1.0, Z, b0, B)
    else:  # Z (the input projection) += h_1 U
        product(n, H, G, S, h + b0, B, blob, w, H, 1.0, Z, b0, B)
    if cell == LSTM:
        lstm_cells(Z, C, S, H, B, layer, b0, b1)
    else:
        rnn_cells(Z, S, H, B, layer, b0, b1)


@_jit
def output(L, H, V, B, b0, b1, blob, offsets, S, logits):
    base = L * PER_LAYER
    fill(logits, V, B, blob, offsets[base + 2], b0, b1)
    product(b1 - b0, H, V, S, (L - 1) * H * B + b0, B, blob, offsets[base + 1], H, 1.0, logits, b0, B)


@_jit
def lookup(ids, G, V, B, b0, blob, table, Z):
    """Z[:, b0 + i] = the first layer's input projection of character ids[i]."""
    for g in range(G):
        inputs, z = blob[table + g * V : table + (g + 1) * V], row(Z, g, B, b0, b0 + ids.shape[0])
        for i in range(ids.shape[0]):
            z[i] = inputs[ids[i]]


# ---------------------------------------------------------------- entry points


@_jit
def advance(cell, L, H, V, B, b0, ids, blob, offsets, S, C, Z, R, logits, sample, temperature, top_k, top_p, u, picked, done):
    """Feed character ids[i] to the stream in column b0 + i: its state steps once and logits[:, b0 + i]
    becomes its prediction for the character after. With `sample`, ids are first picked from those
    columns' logits by the sampler (model.sampling.pick, with per-column temperature, top_k, top_p
    and draw u). Sets picked[0] = 1 once ids are final and done[0] = 1 once everything is written."""
    b1 = b0 + ids.shape[0]
    if sample:
        pick(logits.reshape(V, B)[:, b0:b1].T, temperature, top_k, top_p, u, ids)
    picked[0] = 1
    lookup(ids, gates_of(cell) * H, V, B, b0, blob, offsets[L * PER_LAYER], Z)
    for layer in range(L):
        layer_step(cell, layer, H, B, b0, b1, blob, offsets, S, C, Z, R)
    output(L, H, V, B, b0, b1, blob, offsets, S, logits)
    done[0] = 1


@_jit
def consume(cell, L, H, V, B, slot, ids, blob, offsets, S, C, Z, R, logits):
    """Reset column `slot` to the zero state and feed it the prompt `ids` (T,), one position after
    the other through the same step as `advance`, leaving the prediction for the character after
    the prompt in logits[:, slot]."""
    for r in range(L * H):
        S[r * B + slot] = 0.0
        if cell == LSTM:
            C[r * B + slot] = 0.0
    for t in range(ids.shape[0]):
        lookup(ids[t : t + 1], gates_of(cell) * H, V, B, slot, blob, offsets[L * PER_LAYER], Z)
        for layer in range(L):
            layer_step(cell, layer, H, B, slot, slot + 1, blob, offsets, S, C, Z, R)
    output(L, H, V, B, slot, slot + 1, blob, offsets, S, logits)


@_jit
def wait_done(done, spins):
    """Wait, yielding the core between looks, until every done[i] is 1 or `spins` looks have been
    taken; True if all were done. Between threads this takes microseconds where waking a sleeping
    thread takes 30-100 here."""
    for _ in range(spins):
        if done.min() == 1:
            return True
        _sched_yield()  # also makes every look a fresh read of `done`
    return done.min() == 1
