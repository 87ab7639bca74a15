"""GCS JSON API requests (as recorded by s3_recorder.RecordingProxy with ``parse=parse_gcs``) mapped to the IAM
permissions GCS checks and the resource an IAM condition sees."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

# Permissions of the predefined roles (cloud.google.com/storage/docs/access-control/iam-roles), storage.* part.
OBJECT_VIEWER = frozenset({
    "storage.objects.get", "storage.objects.list", "storage.folders.get", "storage.folders.list",
    "storage.managedFolders.get", "storage.managedFolders.list",
})
OBJECT_USER = OBJECT_VIEWER | {
    "storage.objects.create", "storage.objects.delete", "storage.objects.update", "storage.objects.restore",
    "storage.multipartUploads.abort", "storage.multipartUploads.create", "storage.multipartUploads.list",
    "storage.multipartUploads.listParts", "storage.folders.create", "storage.folders.delete",
    "storage.folders.rename", "storage.managedFolders.create", "storage.managedFolders.delete",
}
OBJECT_ADMIN = OBJECT_USER | {
    "storage.objects.getIamPolicy", "storage.objects.setIamPolicy", "storage.objects.setRetention",
    "storage.objects.overrideUnlockedRetention", "storage.managedFolders.getIamPolicy",
    "storage.managedFolders.setIamPolicy",
}
ROLES = {"roles/storage.objectViewer": OBJECT_VIEWER, "roles/storage.objectUser": OBJECT_USER,
         "roles/storage.objectAdmin": OBJECT_ADMIN}

BUCKET_TYPE, OBJECT_TYPE = "storage.googleapis.com/Bucket", "storage.googleapis.com/Object"


@dataclass(frozen=True)
class GcsCall:
    method: str
    path: str
    query: dict[str, str]
    bucket: str
    name: str | None  # object name, when the request names one

    def needs(self) -> list[tuple[str, str, str, str | None]]:
        """(permission, resource type, resource name, list prefix) for each check GCS makes; an unknown request
        yields a permission starting with UNMAPPED."""
        m, q, b = self.method, self.query, self.bucket
        obj = (OBJECT_TYPE, f"projects/_/buckets/{b}/objects/{self.name}", None)
        kind = _kind(self.path)
        if kind == "objects" and m == "GET":
            return [("storage.objects.list", BUCKET_TYPE, f"projects/_/buckets/{b}", q.get("prefix", ""))]
        if kind == "object" and m == "GET" or kind == "download" and m == "GET":
            return [("storage.objects.get", *obj)]
        if kind == "object" and m == "DELETE":
            return [("storage.objects.delete", *obj)]
        if kind == "object" and m == "PATCH":
            return [("storage.objects.update", *obj)]
        if kind == "upload" and m == "POST" and self.name:
            need = [("storage.objects.create", *obj)]
            if q.get("ifGenerationMatch", "0") != "0":  # replacing an existing generation also deletes it
                need.append(("storage.objects.delete", *obj))
            return need
        if kind == "upload" and m == "PUT" and "upload_id" in q:
            return []  # a chunk of a resumable upload: authorized when the session was created
        if kind == "bucket" and m == "GET":
            return [("storage.buckets.get", BUCKET_TYPE, f"projects/_/buckets/{b}", None)]
        return [(f"UNMAPPED {m} {self.path}", "", "", None)]


def _kind(path: str) -> str:
    if re.fullmatch(r"/upload/storage/v1/b/[^/]+/o", path):
        return "upload"
    if re.fullmatch(r"/download/storage/v1/b/[^/]+/o/.+", path):
        return "download"
    if re.fullmatch(r"/storage/v1/b/[^/]+/o", path):
        return "objects"
    if re.fullmatch(r"/storage/v1/b/[^/]+/o/[^/]+", path):  # object names are %-encoded: no raw "/"
        return "object"
    if re.fullmatch(r"/storage/v1/b/[^/]+", path):
        return "bucket"
    return "other"


def parse_gcs(method: str, target: str, headers, body: bytes) -> GcsCall:
    parts = urlsplit(target)
    path = parts.path
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    m = re.match(r"(?:/upload|/download)?/storage/v1/b/([^/]+)(?:/o/?(.*))?$", path)
    bucket = unquote(m.group(1)) if m else ""
    name = unquote(m.group(2)) if m and m.group(2) else query.get("name")
    if name is None and method == "POST" and body:
        found = re.search(rb'"name"\s*:\s*("(?:[^"\\]|\\.)*")', body)  # JSON metadata of multipart/resumable
        name = json.loads(found.group(1)) if found else None
    return GcsCall(method, path, query, bucket, name)
