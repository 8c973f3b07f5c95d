"""Active protocol features: interceptors that answer or change traffic."""
