"""Request-level search: best-of-N, blockwise controlled decoding and step-level search (beam, DVTS,
particle filtering).

Engine-independent: the spec a request carries (`spec`), how a candidate is picked from
its scores (`selection`), and the scorers that score candidates (`scorers`). The
server runs the engine requests.
"""
