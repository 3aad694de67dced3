"""The command line, above both layers: `model/` (training, artifacts, generation) and `service/`
(the HTTP server). Neither imports it."""
