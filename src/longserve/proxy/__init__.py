"""A compressing OpenAI-compatible proxy: speculative prefill in front of any engine (`longserve proxy`)."""

from longserve.proxy.app import HEADER, ProxyConfig, create_proxy_app

__all__ = ["HEADER", "ProxyConfig", "create_proxy_app"]
