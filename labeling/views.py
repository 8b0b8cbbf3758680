from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from labeling.selectors import labeler_counts


@login_required
def home(request):
    return render(request, "labeling/home.html", {"counts": labeler_counts(request.user)})
