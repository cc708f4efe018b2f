"""Headless command line: ``python -m analysis COMMAND ...``.

- ``command.py``: what a command is (``@command`` gives its help and arguments, ``@renders`` how its result
  reads as text, ``@before_load`` the checks of its arguments) and its progress bar;
- ``options.py``: the options several commands share, and reading them (texts into windows, mask files);
- ``measuring.py``: eval, importance, head-map, drift, tasks;
- ``methods.py``: harp, compare, search, rescale, pareto;
- ``shipping.py``: export, cache pack / unpack;
- ``main.py``: the parser, running a command with the model card and timing, JSON or text, the error line.
"""
