"""Host-integration tests: a real systemd as PID 1 in fresh namespaces (container.py), the emp-agent unit and
installer (test_unit.py, test_systemd.py), cloud-init and Packer. Root only; see container.py for the harness."""
