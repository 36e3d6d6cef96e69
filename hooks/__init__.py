"""Sample repository hooks; `mintvcs init` copies them into `.mint/hooks/`."""
