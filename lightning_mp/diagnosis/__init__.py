"""Understanding a bad step and watching the good ones: where a step went non-finite (``attribution``, and
``replay`` down to the operation and line), per-module headroom and underflow (``statistics``), and the hooks
both use (``hooks``)."""
