"""`ldm-export serve`: bundles behind AUTOMATIC1111's HTTP API on Ray Serve (``pip install ldm-export[serve]``).

A thin layer over ``ldm_export.runtime.Pipeline``: HTTP, batching, backpressure and process lifetime; nothing
about models. It imports the runtime; nothing imports it. Ray and FastAPI are imported lazily.
"""
