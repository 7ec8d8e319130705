"""Privacy accounting: pure maths (accountants, calibration) and the ledger that holds state."""
