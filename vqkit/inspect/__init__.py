"""Seeing inside a model: streaming statistics of its codes (``stats``, no matplotlib), their
pictures (``figures``), a run's inspection folder (``atlas``) and the HTML report (``report``).

Nothing is imported here: ``vqkit.inspect.report`` and ``figures`` load matplotlib, which
commands that draw nothing should not pay for.
"""
