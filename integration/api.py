"""The service's request and response models (pydantic, so the OpenAPI schema says exactly what is
accepted), built for the served data set: its user features and its kinds of raw IDs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from common.data.movielens import user_record as movielens_user_record
from inference_legacy.dlrm_predict import integer_id

RawID = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(integer_id)]
Int64ID = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(integer_id)]
TextID = Annotated[str, Field(min_length=1, max_length=256)]
# An event may be at most this far after the data's last interaction (MovieLens's clock stopped in
# 1998): a timestamp years ahead would move the user's "now", and with it the trend features, for good.
EVENT_CLOCK_SLACK_S = 86_400


class UserFeatures(BaseModel):
    model_config = ConfigDict(extra="forbid")
    age: int = Field(ge=1, le=129, strict=True, description="years", examples=[25])
    gender: Literal["M", "F"] = Field(examples=["F"])
    occupation: str = Field(max_length=64, description="a MovieLens occupation, e.g. 'student'")
    zip: str = Field(
        pattern=r"^([0-9A-Za-z]{5}|[0-9]{5}-[0-9]{4})$",
        description="US zip code, or 5 letters and digits as MovieLens has for Canada (its first digit is the feature)",
        examples=["55414"],
    )
    history: list[RawID] = Field(
        default_factory=list, max_length=1000, description="raw MovieLens item IDs, oldest first"
    )


def _exactly_one(schema: dict[str, Any]) -> None:
    """The schema says what the validator does, so that clients and fuzzers send only bodies we
    accept: exactly one of ``user_id`` and ``features``, neither of them null."""
    for name in ("user_id", "features"):
        prop = schema["properties"][name]
        kept = [s for s in prop.pop("anyOf", []) if s != {"type": "null"}]
        prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept} if kept else {})
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["user_id"]}, {"required": ["features"]}]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one)
    user_id: RawID | None = Field(None, description="a raw MovieLens user ID")
    features: UserFeatures | None = Field(None, description="for a user without a known ID")
    k: int = Field(10, ge=1, le=100, strict=True)

    @model_validator(mode="after")
    def one_of(self) -> RecommendRequest:
        if (self.user_id is None) == (self.features is None):
            raise ValueError("give exactly one of user_id and features")
        return self


MOVIELENS_USER = ("age_bucket", "gender", "occupation", "zip_region", "age")  # common.data.movielens.user_features


def request_model(pipeline) -> type[RecommendRequest]:
    """The request model for the served data set's user features, so that the OpenAPI schema lists
    them. MovieLens takes its raw fields (``UserFeatures``: age in years, zip code) with the
    occupation one of the data set's; any other data set takes its own user columns by name (a
    categorical's value as its data spells it, a number for a numeric column) and ``history``."""
    tables = pipeline.retriever.features
    if tuple(tables.user_vocab) + tuple(tables.user_numeric) == MOVIELENS_USER:
        vocab = tables.user_vocab["occupation"]
        features = create_model(
            "UserFeatures",
            __base__=UserFeatures,
            occupation=(
                Literal[tuple(vocab)],
                Field(
                    description=f"one of {pipeline.dataset.name}'s occupations",
                    examples=["student"] if "student" in vocab else list(vocab)[:1],
                ),
            ),
        )
    else:
        fields: dict[str, Any] = {
            name: (Literal[tuple(vocab)] | None, Field(None, description=f"one of {pipeline.dataset.name}'s {name}s"))
            for name, vocab in tables.user_vocab.items()
        }
        fields.update({name: (float | None, Field(None)) for name in tables.user_numeric})
        fields["history"] = (
            list[id_type(pipeline.dataset.item_raw_ids)],
            Field(default_factory=list, max_length=1000, description="raw item IDs, oldest first"),
        )
        features = create_model("UserFeatures", __config__=ConfigDict(extra="forbid"), **fields)
    return create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        user_id=(id_type(pipeline.dataset.user_raw_ids) | None, Field(None, description="a raw user ID")),
        features=(features | None, Field(None, description="for a user without a known ID")),
    )


def event_model(dataset) -> type[EventRequest]:
    """The event model with the data set's kinds of raw IDs (integers, or text)."""
    return create_model(
        "EventRequest",
        __base__=EventRequest,
        user_id=(id_type(dataset.user_raw_ids), ...),
        item_id=(id_type(dataset.item_raw_ids), ...),
    )


def user_record(features: BaseModel) -> dict[str, Any]:
    """A request's features as the canonical record the retriever takes (MovieLens's raw fields
    mapped onto its columns; a generic data set's are already its columns)."""
    d = features.model_dump()
    if isinstance(features, UserFeatures):
        return {**movielens_user_record(d["age"], d["gender"], d["occupation"], d["zip"]), "history": d["history"]}
    return {k: v for k, v in d.items() if v is not None}


def id_type(raw_ids: np.ndarray) -> Any:
    """A data set's raw IDs as a request field: text where its IDs are text (a log's "sku-001"),
    else integers (MovieLens's and most logs' within 0..2**31-1, else any 64-bit integer)."""
    if raw_ids.dtype.kind in "OUS":
        return TextID
    return RawID if len(raw_ids) == 0 or (raw_ids.min() >= 0 and raw_ids.max() <= 2**31 - 1) else Int64ID


class Item(BaseModel):
    item_id: int | str
    title: str
    score: float
    again: bool | None = Field(
        default=None, description="on a data set with repeats: whether the user had this item before"
    )


class RecommendResponse(BaseModel):
    user_id: int | str
    stage: str = Field(
        description="ranked | candidates (the served system is a candidate source's own order, e.g. the "
        "ensemble's) | retrieval (described by features) | popular (cold start)"
    )
    arm: str | None = Field(description="the A/B arm that ranked the list (null when no ranker did)")
    cached: bool = Field(description="whether the candidates came from the cache")
    items: list[Item]


class Movie(BaseModel):
    item_id: int | str
    title: str = Field(description="the raw item ID when the data set has no titles")


class UserView(BaseModel):
    user_id: int | str
    history_length: int
    recent: list[Movie] = Field(description="the latest interactions, most recent first")


class SearchResults(BaseModel):
    query: str
    items: list[Movie] = Field(
        description="titles starting with the query first, then containing it; the more popular first within each"
    )


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: RawID
    item_id: RawID
    timestamp: int | None = Field(
        None,
        ge=0,
        strict=True,
        description=(
            "unix seconds, at most one day after the data's last interaction (default: the user's latest "
            "interaction: the ranker's trend features count the 30 days before it, so a MovieLens user must stay "
            "on MovieLens's clock)"
        ),
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[!-~]+$",
        description=(
            "the client's unique ID for this event: a retry with the same ID is acknowledged without applying the "
            "event twice (the last 100,000 IDs are remembered)"
        ),
    )


class EventResponse(BaseModel):
    user_id: int | str
    history_length: int = Field(description="the user's history after the event (at most 1,000, the latest)")
    duplicate: bool = Field(False, description="an event_id seen before: acknowledged again, not applied twice")
