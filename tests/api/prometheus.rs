//! A real Prometheus scraping a running quotad, and the Grafana dashboard checked against what quotad exports.
