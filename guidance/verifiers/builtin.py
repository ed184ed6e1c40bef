"""The built-in verifiers, registered when ``guidance.verifiers`` is imported.

| name | reward 1.0 when | reference |
|---|---|---|
| ``demo-verifier`` | the completion's first integer answers the demo problem in the prompt | not read |
| ``arith-first-line`` | the last integer on the completion's first line is the chat-arith sum asked | not read |
| ``math`` | the completion's final answer equals the reference mathematically (math-verify) | number or string |
| ``exact`` | the normalised completion equals the reference (strip, collapse spaces, case-fold) | string or list |
| ``regex`` | the pattern matches anywhere in the completion (``re.search``) | pattern string |
| ``json-schema`` | the completion (or its ```json block) is JSON valid under the schema | JSON schema |
| ``python-tests`` | the completion's code passes the tests in the sandbox | asserts, or HumanEval's test |

``python-tests`` runs code that comes with the reference, so it is not served: requests cannot
name it as a search scorer (a request's reference would be code run on the server).
"""

from __future__ import annotations

from guidance.verifiers.answers import exact, json_schema, math_answer, math_final_answer, regex
from guidance.verifiers.python_tests import PythonTests
from guidance.verifiers.registry import register_verifier
from models.demo.task import first_integer
from models.demo.task import reward as demo_reward
from models.tasks.chat_arith import first_line_answer
from models.tasks.chat_arith import reward as arith_first_line_reward

register_verifier("demo-verifier", demo_reward, answer=first_integer)
register_verifier("arith-first-line", arith_first_line_reward, answer=first_line_answer)
register_verifier("math", math_answer, answer=math_final_answer, needs_reference=True)
register_verifier("exact", exact, needs_reference=True)
register_verifier("regex", regex, needs_reference=True)
register_verifier("json-schema", json_schema, needs_reference=True)
register_verifier("python-tests", PythonTests(), needs_reference=True, served=False)
