"""Entry point of a benchmark worker process (see ``common.Worker``): builds one peer and
answers run requests on stdin/stdout, one JSON object per line."""

import json
import sys

from .common import serve

if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
