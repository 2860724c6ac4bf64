"""The simulated Qubes system: qubesd, lvm, the import service and the generator (see docs/SIMULATION.md)."""
