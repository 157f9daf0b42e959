"""What the packages the roles install do on the simulated hosts of tests/deploy/simhost.py."""

# What installing a package does besides putting its files, as Debian's and Ubuntu's maintainer
# scripts do: services started and enabled, system users (each with its own group), folders, links.
PACKAGE_EFFECTS: dict[str, dict] = {
    "nginx": {"services": ["nginx.service"],
              "links": {"/etc/nginx/sites-enabled/default": "/etc/nginx/sites-available/default"}},
    # Its postinst enables the module: nginx loads it from every configuration.
    "libnginx-mod-http-js": {"links": {"/etc/nginx/modules-enabled/50-mod-http-js.conf":
                                       "/usr/share/nginx/modules-available/mod-http-js.conf"}},
    "prometheus": {"services": ["prometheus.service"], "users": ["prometheus"],
                   "dirs": ["/etc/prometheus", "/var/lib/prometheus"]},
    "prometheus-alertmanager": {"services": ["prometheus-alertmanager.service"], "users": ["prometheus"],
                                "dirs": ["/etc/prometheus", "/var/lib/prometheus"]},
    "prometheus-node-exporter": {"services": ["prometheus-node-exporter.service"], "users": ["prometheus"],
                                 "dirs": ["/var/lib/prometheus", "/var/lib/prometheus/node-exporter"]},
    "prometheus-nginx-exporter": {"services": ["prometheus-nginx-exporter.service"], "users": ["prometheus"]},
    # Grafana's package (packaging/deb/control/postinst of grafana/grafana) makes its user and folders
    # and, on a first installation, neither starts nor enables grafana-server.service.
    "grafana": {"users": ["grafana"], "dirs": ["/etc/grafana", "/var/lib/grafana", "/var/log/grafana"]},
}
