"""The optimizer step: ``core.PrecisionCore`` runs it in order; ``batch`` is one step's batch; ``buffers`` and
``side_effects`` are what a skipped step or a re-run of the user's code puts back."""
