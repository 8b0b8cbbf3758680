"""Forms parse what the pages post into service inputs. Business rules live in services."""

import json

from django import forms

from labeling.limits import CONTENT_SKIP_REASON, MAX_MESSAGE_CHARS
from labeling.models import Assignment, CandidateFlag, LabelerProfile, Review
from labeling.selectors import CandidateHandles
from labeling.services.submissions import RankingInput

LANGUAGES = [
    ("en", "English"),
    ("de", "German"),
    ("es", "Spanish"),
    ("fr", "French"),
    ("it", "Italian"),
    ("pt", "Portuguese"),
    ("nl", "Dutch"),
    ("pl", "Polish"),
    ("ru", "Russian"),
    ("uk", "Ukrainian"),
    ("tr", "Turkish"),
    ("ar", "Arabic"),
    ("hi", "Hindi"),
    ("ja", "Japanese"),
    ("ko", "Korean"),
    ("zh", "Chinese"),
]
SKIP_REASONS = [
    "I don't know enough about this topic",
    "The task is unclear",
    "It is not in a language I know well",
    CONTENT_SKIP_REASON,
]


class MessageTextField(forms.CharField):
    """A message's text as the labeler typed it: line breaks as the browser shows them (a form posts each as CRLF,
    which would count twice against the limit), at most MAX_MESSAGE_CHARS characters (code points, as the page's
    counter counts them), and a clear error beyond that instead of the browser cutting a paste short."""

    def __init__(self, **kwargs):
        kwargs.setdefault("strip", False)
        kwargs.setdefault("max_length", MAX_MESSAGE_CHARS)
        super().__init__(**kwargs)
        self.error_messages["max_length"] = (
            f"The text is %(show_value)s characters long; the limit is {MAX_MESSAGE_CHARS:,}. "
            "Shorten it, then submit again (your text is kept below)."
        )

    def to_python(self, value):
        value = super().to_python(value)
        return value.replace("\r\n", "\n").replace("\r", "\n") if isinstance(value, str) else value


class TimedForm(forms.Form):
    time_spent_ms = forms.IntegerField(
        required=False, min_value=0, max_value=24 * 3600 * 1000, widget=forms.HiddenInput
    )


class WriteForm(TimedForm):
    text = MessageTextField(
        widget=forms.Textarea(attrs={"rows": 12}),
        error_messages={"required": "Write something first: the text is empty."},
    )

    def clean_text(self):
        text = self.cleaned_data["text"]
        if not text.strip():
            raise forms.ValidationError("Write something first: the text is empty.")
        return text


class PromptForm(WriteForm):
    language = forms.ChoiceField(choices=LANGUAGES, initial="en")
    tags = forms.CharField(required=False, max_length=400, help_text="Comma-separated, e.g. cooking, travel")

    def clean_tags(self):
        return [t.strip() for t in self.cleaned_data["tags"].split(",") if t.strip()]


MAX_ORDER_CHARS = 2000  # nine candidates' ids as groups need well under 200


class RankingForm(TimedForm):
    order = forms.CharField(widget=forms.HiddenInput, error_messages={"required": "Put the candidates in order."})
    quality_rating = forms.TypedChoiceField(
        choices=[(str(i), str(i)) for i in range(1, 8)],
        coerce=int,
        widget=forms.RadioSelect,
        error_messages={"required": "Rate the overall quality of the replies from 1 to 7."},
    )
    all_unacceptable = forms.BooleanField(required=False)
    confirm_untouched = forms.BooleanField(required=False, widget=forms.HiddenInput)
    improvement = MessageTextField(required=False, widget=forms.Textarea(attrs={"rows": 8}))

    def __init__(self, *args, handles=None, **kwargs):
        """`handles`: {message id: the opaque handle the page shows for it} (selectors.candidate_handles)."""
        super().__init__(*args, **kwargs)
        self.handles = dict(handles or {})
        self.candidates = CandidateHandles(self.handles)
        self.candidate_ids = list(self.handles)

    def clean_order(self):
        text = self.cleaned_data["order"]
        unreadable = forms.ValidationError("The order could not be read; reload the page.")
        if len(text) > MAX_ORDER_CHARS:
            raise unreadable
        try:
            order = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise unreadable from None
        if not (
            isinstance(order, list)
            and all(isinstance(group, list) and group for group in order)
            and not self.candidates.unknown(h for group in order for h in group)
        ):
            raise unreadable
        return self.candidates.order_ids(order)

    def ranking_input(self) -> RankingInput:
        data = self.cleaned_data
        flags = {}
        for message_id, handle in self.handles.items():
            chosen = [f for f in self.data.getlist(f"flags-{handle}") if f]
            if chosen:
                flags[message_id] = chosen
        return RankingInput(
            order=data["order"],
            flags=flags,
            quality_rating=data["quality_rating"],
            all_unacceptable=data["all_unacceptable"],
            confirm_untouched=data["confirm_untouched"],
            improvement=data.get("improvement") or "",
        )


class ReviewForm(TimedForm):
    decision = forms.ChoiceField(choices=Review.Decision.choices, error_messages={"required": "Accept or reject."})
    reason = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 3}))


OTHER_SKIP_REASON = "Other"


class SkipForm(forms.Form):
    reason = forms.CharField(max_length=500, error_messages={"required": "Choose or write a reason for skipping."})
    other = forms.CharField(required=False, max_length=480, strip=True)

    def clean(self):
        data = super().clean()
        if data.get("reason") == OTHER_SKIP_REASON:
            if not data.get("other"):
                raise forms.ValidationError("Say in a few words why you skip (you chose Other).")
            data["reason"] = f"Other: {data['other']}"
        return data


class ReportForm(forms.Form):
    reason = forms.ChoiceField(choices=Assignment.ReportReason.choices)
    note = forms.CharField(required=False, max_length=500)


class ProfileForm(forms.ModelForm):
    languages = forms.MultipleChoiceField(
        choices=LANGUAGES,
        widget=forms.CheckboxSelectMultiple,
        error_messages={"required": "Choose at least one language you can write and judge well."},
    )
    topics = forms.CharField(required=False, max_length=500, help_text="Comma-separated, e.g. cooking, law, python")

    class Meta:
        model = LabelerProfile
        fields = ["languages", "topics"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance and self.instance.pk:
            self.initial["topics"] = ", ".join(self.instance.topics)

    def clean_topics(self):
        topics = sorted({t.strip().lower() for t in self.cleaned_data["topics"].split(",") if t.strip()})
        if len(topics) > 20 or any(len(t) > 48 for t in topics):
            raise forms.ValidationError("Up to 20 topics of at most 48 characters each.")
        return topics


FLAG_CHOICES = CandidateFlag.choices
