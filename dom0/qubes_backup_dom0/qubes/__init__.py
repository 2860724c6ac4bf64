"""The Qubes side: endpoints, the Admin API client, the system interface, pool drivers, qubes.xml model."""
