"""The short device description a session gets from its User-Agent (`sessions.describe_device`)."""

from __future__ import annotations

import pytest

from services.auth.sessions import DEVICE_MAX, UNKNOWN_DEVICE, describe_device

BROWSERS = [
    ("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "Firefox on Linux"),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "Chrome on macOS",
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.86",
        "Edge on Windows",
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36 OPR/115.0.0.0",
        "Opera on Windows",
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Safari/605.1.15",
        "Safari on macOS",
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Mobile/15E148 Safari/604.1",
        "Safari on iOS",
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
        "Chrome on iOS",
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "FxiOS/133.0 Mobile/15E148 Safari/605.1.15",
        "Firefox on iPadOS",
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.81 Mobile Safari/537.36",
        "Chrome on Android",
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; SM-S928B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
        "Samsung Internet on Android",
    ),
    (
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "Chrome on ChromeOS",
    ),
    ("Mozilla/5.0 (Windows NT 10.0; Trident/7.0; rv:11.0) like Gecko", "Internet Explorer on Windows"),
]

TOOLS = [
    ("curl/8.5.0", "curl"),
    ("Wget/1.21.4", "Wget"),
    ("python-requests/2.32.3", "Python requests"),
    ("python-httpx/0.28.1", "Python httpx"),
    ("Python-urllib/3.11", "Python urllib"),
    ("OpenAI/Python 1.57.0", "OpenAI Python SDK"),
    ("Go-http-client/2.0", "Go HTTP client"),
    ("okhttp/4.12.0", "OkHttp"),
    ("PostmanRuntime/7.42.0", "Postman"),
    ("HTTPie/3.2.4", "HTTPie"),
    ("grpc-python-asyncio/1.68.1 grpc-c/44.0.0 (linux; chttp2)", "gRPC client"),
    ("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", "Node.js"),
]


@pytest.mark.parametrize(("user_agent", "expected"), BROWSERS + TOOLS)
def test_known_clients_are_named(user_agent: str, expected: str) -> None:
    assert describe_device(user_agent) == expected


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        ("", UNKNOWN_DEVICE),
        ("   ", UNKNOWN_DEVICE),
        ("\x00\x01", UNKNOWN_DEVICE),
        ("🙂", UNKNOWN_DEVICE),
        ("Mozilla/5.0 (X11; Linux x86_64) SomethingNew/1.0", "Browser on Linux"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "Browser on Windows"),
        ("MyApp/2.3 (Linux; arm64)", "App on Linux"),
        ("ParleyCLI/0.1.0", "ParleyCLI"),
        ("Mozilla/5.0 SomeBrowser", "Mozilla"),
    ],
)
def test_unknown_clients_get_an_honest_short_description(user_agent: str, expected: str) -> None:
    assert describe_device(user_agent) == expected


def test_descriptions_are_short_whatever_the_header() -> None:
    huge = "Z" + "z" * 10_000
    assert len(describe_device(huge)) <= 40 <= DEVICE_MAX
    assert "\n" not in describe_device("curl/8\r\nX-Injected: yes")
