"""Request-level search: best-of-N and blockwise controlled decoding.

Engine-independent: the spec a request carries (`spec`), how a candidate is picked from
its scores (`selection`), and the scorers that score candidates (`scorers`). The
server runs the engine requests.
"""
