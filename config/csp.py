"""A Content-Security-Policy on every response: scripts only from this site's own files (no inline script, no
eval), so that a script slipped into a page (a reply's Markdown, an imported prompt) cannot run. Styles may be
inline (a few templates and htmx's indicator style use them); nothing else is loaded from other origins."""

from django.conf import settings


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        policy = settings.CONTENT_SECURITY_POLICY
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy
        return response
