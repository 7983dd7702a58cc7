"""`adapters ui`: a read-only web view of the store (Flask/Werkzeug; pages rendered server-side)."""
