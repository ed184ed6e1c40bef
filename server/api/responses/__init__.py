"""POST /v1/responses, GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: OpenAI's Responses API,
as vLLM's server speaks it."""
