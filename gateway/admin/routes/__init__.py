"""The admin API's endpoints, one module per area; each returns a list of `Endpoint`s that
map a path to a model and a typed method of the control plane or a component."""
