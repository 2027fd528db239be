"""A misbehaving chat-completions server for the judge tests: `python fake_judge.py PORT MODE [N]`.

MODE: `good` (an assessment, then grades in the required format), `retry` (the first grades in another
format, then good ones), `chatty` (never in the format), `garbage` (not JSON), `sleep` (never answers in
time), `good_then_garbage` (good for N requests, garbage after). GET /count gives the requests served.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GRADES = "Grammar: 8/10\nCreativity: 6/10\nConsistency: 7/10\nPlot: 5/10\nAge group: C"
CHATTY = "I would say the grammar is about 8 out of 10 and the plot is fine."
PORT, MODE = int(sys.argv[1]), sys.argv[2]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 0
served = 0


def reply(messages: list[dict]) -> str:
    last = messages[-1]["content"]
    if "***" in last:
        return "The completion is grammatical and follows the beginning."
    asked_again = "not in the required format" in last
    if MODE == "chatty" or (MODE == "retry" and not asked_again):
        return CHATTY
    return GRADES


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, json.dumps({"count": served}).encode())

    def do_POST(self):
        global served
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        served += 1
        if MODE == "sleep":
            time.sleep(30)
        if MODE == "garbage" or (MODE == "good_then_garbage" and served > N):
            return self._send(200, b"<html>502 Bad Gateway</html>")
        body = {"choices": [{"message": {"role": "assistant", "content": reply(request["messages"])}}]}
        self._send(200, json.dumps(body).encode())

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
