"""Every answer says which release served it (X-Shop-Version), so a deploy or rollback is visible."""

from shop._version import __version__

__all__ = ["version_header"]


def version_header(get_response):
    def middleware(request):
        response = get_response(request)
        response["X-Shop-Version"] = __version__
        return response
    return middleware
