"""Protocol-faithful fakes of the LLM providers we cannot reach: real HTTP on
loopback, real SSE framing over chunked transfer encoding, real error bodies
and status codes, Retry-After, hangs and mid-stream drops."""
