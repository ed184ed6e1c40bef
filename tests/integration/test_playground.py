"""The playground in a real headless browser (Debian's chromium driven by Playwright) against the demo server.

Without chromium or Playwright these tests skip on a developer's machine and fail under CI (CI=true), where
scripts/test.sh installs both. The comparison's screenshot goes to $ALIGNSERVE_ARTIFACTS (default:
test-artifacts/ at the repository root), which CI keeps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ALIGNSERVE_ARTIFACTS", REPO / "test-artifacts"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN_TIMEOUT_MS = 180_000
KEY = "playground-key"
# Counts the text changes of each column's output, to compare with the chunks the server streamed.
COUNT_OUTPUT_UPDATES = """() => {
  window.outputUpdates = {};
  for (const column of document.querySelectorAll(".column")) {
    const id = column.dataset.column;
    window.outputUpdates[id] = 0;
    new MutationObserver((records) => { window.outputUpdates[id] += records.length; })
      .observe(column.querySelector(".output"), { childList: true, characterData: true, subtree: true });
  }
}"""


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("chromium is not installed: apt-get install chromium (scripts/test.sh installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: it is in the dev extra (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


class Playground:
    """A browser page on a server's playground, recording what the page sent and any script error."""

    def __init__(self, browser, server: RunningServer) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900},
                                           permissions=["clipboard-read", "clipboard-write"])
        self.page = self.context.new_page()
        self.server = server
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.posts: list = []  # the generation requests' responses, in the order they came
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", self._check_origin)
        self.page.on("response", lambda response: self.posts.append(response)
                     if response.request.method == "POST" else None)

    def _check_origin(self, request) -> None:
        if not request.url.startswith((self.server.base_url + "/", "data:")):
            self.foreign.append(request.url)

    def open(self) -> Playground:
        self.page.goto(f"{self.server.base_url}/playground")
        return self

    def wait_connected(self) -> None:
        self.page.locator('[data-column="1"] select.module option').first.wait_for(state="attached")

    def column(self, name: str):
        return self.page.locator(f'[data-column="{name}"]')

    def stats(self, name: str) -> dict[str, str]:
        column = self.column(name)
        return {stat: column.locator(f'[data-stat="{stat}"]').inner_text()
                for stat in ("kl", "steps", "score", "candidates", "tokens", "generated", "finish", "time")}

    def run(self) -> None:
        self.posts.clear()
        self.page.click("#run")  # marks every column running before it returns
        from playwright.sync_api import expect

        expect(self.page.locator(".column.running")).to_have_count(0, timeout=RUN_TIMEOUT_MS)

    def sent(self, predicate) -> tuple[str, dict, str]:
        """URL, JSON body and streamed response text of the one generation request matching `predicate`."""
        matching = [response for response in self.posts if predicate(response.request.post_data_json)]
        assert len(matching) == 1, [response.request.post_data_json for response in self.posts]
        return matching[0].url, matching[0].request.post_data_json, matching[0].text()

    def snippet(self, name: str, kind: str) -> str:
        self.column(name).locator(f".copy-{kind}").click()
        text = self.column(name).locator(".snippet").text_content()
        assert self.page.evaluate("() => navigator.clipboard.readText()") == text
        return text

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors
        assert not self.foreign, f"the page loaded from elsewhere: {self.foreign}"


@pytest.fixture
def playground(browser, server: RunningServer) -> Iterator[Playground]:
    opened = Playground(browser, server).open()
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("keyed") / "server.log", "--api-keys", KEY)
    yield running
    stop_server(running)


def streamed_texts(sse_body: str) -> list[str]:
    """The non-empty texts of a streamed completion or chat response, chunk by chunk."""
    texts = []
    for line in sse_body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: "):])["choices"]:
            text = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if text:
                texts.append(text)
    return texts


def curl_request(command: str) -> tuple[str, dict[str, str], dict]:
    """URL, headers and JSON body of a `curl -N URL -H ... -d BODY` command, as a shell would pass them."""
    # A shell drops each backslash-newline (line continuation) and expands the key's variable.
    words = shlex.split(command.replace("\\\n", "").replace("$OPENAI_API_KEY", KEY))
    assert words[:2] == ["curl", "-N"], words
    url, headers, body = words[2], {}, None
    for flag, value in zip(words[3::2], words[4::2], strict=True):
        if flag == "-H":
            name, _, header_value = value.partition(": ")
            headers[name] = header_value
        else:
            assert flag == "-d", flag
            body = json.loads(value)
    return url, headers, body


def run_python(script: str, api_key: str | None = None) -> str:
    env = {**os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {})}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_comparison_streams_each_column_and_reports_guidance(playground: Playground, http: httpx.Client):
    page = playground.page
    playground.wait_connected()
    assert page.locator("#status").is_hidden()
    assert page.locator('[data-column="base"] .config').count() == 0

    guided = playground.column("1")
    guided.locator("select.module").select_option("qsharp")
    guided.locator("select.guide-model").select_option("demo-value")
    guided.locator('input[name="strength"]').fill("4")
    # The KL-budget input follows what the server advertises for the module.
    advertised = next(module for module in http.get("/v1/guidance").json()["modules"] if module["type"] == "qsharp")
    assert guided.locator('input[name="max_kl"]').count() == ("max_kl" in advertised["parameters"])

    page.click("#add-column")
    search = playground.column("2")
    search.locator("select.module").select_option("")
    search.locator("select.search-type").select_option("best_of_n")
    search.locator("select.scorer").select_option("demo-reward")
    search.locator('input[name="n"]').fill("4")
    search.locator("input.prune").check()
    search.locator("select.prune-scorer").select_option("demo-value-hist")
    search.locator('.prune-params input[name="every"]').fill("2")  # read from the listed prune schema
    page.fill("#prompt", "123+456=")
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "1")
    page.evaluate(COUNT_OUTPUT_UPDATES)
    playground.run()

    for name in ("base", "1", "2"):
        assert playground.column(name).locator(".error").is_hidden(), playground.column(name).inner_text()
    updates = page.evaluate("() => window.outputUpdates")
    url, base_body, base_stream = playground.sent(lambda body: "guidance" not in body and "search" not in body)
    assert url == f"{playground.server.base_url}/v1/completions"
    _, guided_body, guided_stream = playground.sent(lambda body: "guidance" in body)
    _, search_body, _ = playground.sent(lambda body: "search" in body)
    assert guided_body["guidance"] == [{"type": "qsharp", "model": "demo-value", "strength": 4}]
    assert search_body["search"] == {"type": "best_of_n", "scorer": "demo-reward", "n": 4,
                                     "prune": {"scorer": "demo-value-hist", "every": 2, "fraction": 0.5}}

    # Token by token: the page showed each streamed chunk as it came, and shows the whole text.
    for name, stream in (("base", base_stream), ("1", guided_stream)):
        texts = streamed_texts(stream)
        assert texts and updates[name] == len(texts), (name, updates, texts)
        assert playground.column(name).locator(".output").text_content() == "".join(texts)

    base, guided_stats, search_stats = playground.stats("base"), playground.stats("1"), playground.stats("2")
    assert base["kl"] == "–" and int(base["tokens"]) > 0 and base["finish"] in ("stop", "length")
    assert float(guided_stats["kl"]) > 0 and int(guided_stats["steps"]) > 0
    assert int(guided_stats["tokens"]) >= len(streamed_texts(guided_stream))
    candidates = search_stats["candidates"].split(", ")
    assert len(candidates) == 4 and sum(entry.startswith("[") for entry in candidates) == 1, candidates
    assert float(search_stats["score"]) == max(float(entry.strip("[]")) for entry in candidates
                                               if entry != "pruned")
    assert int(search_stats["generated"]) >= int(search_stats["tokens"])
    for stats in (base, guided_stats, search_stats):
        assert re.fullmatch(r"\d+\.\d\d s \(first token \d+\.\d\d s\)", stats["time"]), stats["time"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # Copy as curl: the column's exact request, which the server answers with a guidance report.
    curl_url, headers, curl_body = curl_request(playground.snippet("1", "curl"))
    assert (curl_url, curl_body) == (url, guided_body) and "Authorization" not in headers
    with httpx.stream("POST", curl_url, headers=headers, json=curl_body, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert any(choice.get("guidance", {}).get("kl", -1) >= 0 for event in events for choice in event["choices"])

    # Copy as Python: the openai SDK script runs and prints the search's report.
    script = playground.snippet("2", "python")
    assert "extra_body=" in script and 'api_key="unused"' in script
    printed = run_python(script)
    assert "'candidate_scores'" in printed and "usage:" in printed, printed


def test_kl_budget_input_appears_and_is_sent_when_advertised(playground: Playground):
    """A server whose /v1/guidance lists `max_kl` for a module gets a KL-budget input, sent with the entry."""
    def advertise_max_kl(route) -> None:
        response = route.fetch()
        catalog = response.json()
        for module in catalog["modules"]:
            module["parameters"].setdefault("max_kl", {"anyOf": [{"type": "number"}, {"type": "null"}],
                                                       "default": None, "minimum": 0, "title": "Max Kl"})
        route.fulfill(response=response, json=catalog)

    page = playground.page
    page.route("**/v1/guidance", advertise_max_kl)
    page.reload()
    playground.wait_connected()
    guided = playground.column("1")
    guided.locator("select.module").select_option("qsharp")
    budget = guided.locator('input[name="max_kl"]')
    label = guided.locator("label", has=page.locator('input[name="max_kl"]'))
    assert budget.is_visible() and label.inner_text().startswith("KL budget")
    budget.fill("2.5")
    playground.run()
    _, body, _ = playground.sent(lambda body: "guidance" in body)
    assert body["guidance"][0]["max_kl"] == 2.5


def test_api_keys_apply_to_the_page_calls(browser, keyed_server: RunningServer):
    playground = Playground(browser, keyed_server)
    try:
        page = playground.page
        response = page.goto(f"{keyed_server.base_url}/playground")
        assert response.status == 200  # the page itself is open
        status = page.locator("#status")
        status.wait_for(state="visible")
        assert "401" in status.inner_text() and "invalid_api_key" in status.inner_text()
        assert page.locator("#run").is_disabled() and page.locator(".column").count() == 0

        page.fill("#api-key", KEY)
        page.click("#connect")
        playground.wait_connected()
        assert status.is_hidden()
        page.select_option("#mode", "chat")
        page.fill("#system", "Answer with the number only.")
        page.fill("#prompt", "7+8=")

        page.fill("#api-key", "")  # a missing key fails every column visibly
        playground.run()
        for name in ("base", "1"):
            error = playground.column(name).locator(".error")
            assert error.is_visible() and "401 invalid_api_key" in error.inner_text()

        page.fill("#api-key", KEY)
        playground.run()
        url, body, _ = playground.sent(lambda body: "guidance" in body)
        assert url == f"{keyed_server.base_url}/v1/chat/completions"
        assert body["messages"] == [{"role": "system", "content": "Answer with the number only."},
                                    {"role": "user", "content": "7+8="}]
        assert playground.column("base").locator(".output").text_content()
        assert float(playground.stats("1")["kl"]) >= 0

        # The snippets name the key's variable, never the key.
        curl = playground.snippet("1", "curl")
        assert KEY not in curl and '"Authorization: Bearer $OPENAI_API_KEY"' in curl
        curl_url, headers, curl_body = curl_request(curl)
        assert (curl_url, curl_body, headers["Authorization"]) == (url, body, f"Bearer {KEY}")
        assert httpx.post(curl_url, headers=headers, json=curl_body, timeout=120).status_code == 200
        script = playground.snippet("1", "python")
        assert KEY not in script and 'os.environ["OPENAI_API_KEY"]' in script
        assert "guidance: {'kl':" in run_python(script, api_key=KEY)
    finally:
        playground.close()
