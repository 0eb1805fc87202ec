"""Model surgery: find a model's FFNs (registry, detection), group their neurons into experts, wrap
each FFN with a router (the LTE layer), inject/save/load it, and initialise the routers.
Imports only :mod:`lte.core` from the rest of ``lte``."""
