"""What every layer shares: the cell spec, the axes, the record and its schema, the run
folder, units and errors. Pure: no torch, no pandas."""
