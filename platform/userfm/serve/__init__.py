"""Serving: the Ray Serve application (embedding deployment, head deployments, HTTP ingress).

``userfm.serve:app_builder`` stays importable here for ``serve run`` configs; the code is in ``serve.app``.
"""


def __getattr__(name: str):
    # lazy (PEP 562): importing userfm.serve.<module> must not import Ray Serve
    if name == "app_builder":
        from userfm.serve.app import app_builder

        return app_builder
    raise AttributeError(f"module 'userfm.serve' has no attribute {name!r}")
