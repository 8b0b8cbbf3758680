from django.db import connection
from django.http import JsonResponse


def healthz(request):
    """Liveness of the web process and its database; used by compose and the run script."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
