"""The ClientApp: each client preprocesses its own partition and trains with DP-SGD."""
