from django.db import connection
from django.http import HttpResponse, JsonResponse


def healthz(request):
    """Liveness of the web process and its database; used by compose and the run script."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def no_favicon(request):
    """No icon (the pages declare an empty one); 204 instead of a logged 404 for the browsers that ask anyway."""
    response = HttpResponse(status=204)
    response["Cache-Control"] = "public, max-age=86400"
    return response
