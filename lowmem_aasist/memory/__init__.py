"""Memory engine: device facts now; measurement, estimation, planning and techniques grow here."""
