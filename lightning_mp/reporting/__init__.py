"""What a run tells: its events and counts (``events``, ``ledger``), the scale over time (``history``), the
warnings (``warnings``), the report (``report``) and the Lightning callbacks that log and write it
(``callbacks``)."""
