"""An in-memory moto server that behaves like DynamoDB in one respect moto does not: one request at a time."""

from __future__ import annotations

import threading
from typing import Any


def serial_moto_server(port: int) -> Any:
    """moto's threaded server on 127.0.0.1:`port`, answering one request at a time (not started).

    moto's DynamoDB is not safe under concurrent requests: a TransactWriteItems copies the tables it
    touches when it begins and, if it is cancelled, puts that copy back, erasing whatever concurrent
    requests wrote meanwhile (their stream records too), and readers can see its partial writes. DynamoDB
    (and DynamoDB Local) apply each request atomically; so does this. Seen in the tests as a lost or a
    doubled CreditsExpired when the sweep's worker threads wrote concurrently.
    """
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            lock = threading.Lock()

            def serial(environ: dict[str, Any], start_response: Any) -> list[bytes]:
                with lock:
                    return list(app(environ, start_response))

            self._server = make_server(self._ip_address, self._port, serial, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerialMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
