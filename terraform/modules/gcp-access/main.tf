# Least-privilege access to one cloudckpt run prefix: a training service account with Storage Object Admin and a CI
# restore service account with Storage Object Viewer, both granted on the bucket under an IAM condition that admits
# only objects below the prefix and object listings whose prefix lies below it.
#
# GCS checks objects.list on the bucket, not on objects; the storage.googleapis.com/objectListPrefix attribute is
# how a condition limits a listing to a prefix (cloudckpt always lists with the run prefix).

locals {
  restore_prefix = coalesce(var.restore_prefix, var.run_prefix)
  object_root    = "projects/_/buckets/${var.bucket_name}/objects/"

  training_condition = join(" || ", [
    "(resource.type == \"storage.googleapis.com/Object\" && resource.name.startsWith(\"${local.object_root}${var.run_prefix}/\"))",
    "(resource.type == \"storage.googleapis.com/Bucket\" && api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${var.run_prefix}/\"))",
  ])
  restore_condition = join(" || ", [
    "(resource.type == \"storage.googleapis.com/Object\" && resource.name.startsWith(\"${local.object_root}${local.restore_prefix}/\"))",
    "(resource.type == \"storage.googleapis.com/Bucket\" && api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${local.restore_prefix}/\"))",
  ])
}

resource "google_service_account" "training" {
  project      = var.project_id
  account_id   = "${var.name}-train"
  display_name = "cloudckpt training (${var.run_prefix})"
  description  = "Writes checkpoints under gs://${var.bucket_name}/${var.run_prefix}/"
}

resource "google_service_account" "restore" {
  project      = var.project_id
  account_id   = "${var.name}-ci"
  display_name = "cloudckpt CI restore (${local.restore_prefix})"
  description  = "Reads checkpoints under gs://${var.bucket_name}/${local.restore_prefix}/"
}

resource "google_storage_bucket_iam_member" "training" {
  bucket = var.bucket_name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.training.email}"

  condition {
    title       = "cloudckpt-run-prefix"
    description = "Only objects under ${var.run_prefix}/"
    expression  = local.training_condition
  }
}

resource "google_storage_bucket_iam_member" "restore" {
  bucket = var.bucket_name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.restore.email}"

  condition {
    title       = "cloudckpt-restore-prefix"
    description = "Only objects under ${local.restore_prefix}/"
    expression  = local.restore_condition
  }
}

# GKE Workload Identity: the Kubernetes service account acts as the training service account (no key files).
resource "google_service_account_iam_member" "training_workload_identity" {
  for_each           = toset(var.gke_service_accounts)
  service_account_id = google_service_account.training.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${each.value}]"
}

# CI (e.g. GitHub Actions through Workload Identity Federation) impersonates the restore service account.
resource "google_service_account_iam_member" "ci_impersonation" {
  for_each           = toset(var.ci_principals)
  service_account_id = google_service_account.restore.name
  role               = "roles/iam.workloadIdentityUser"
  member             = each.value
}
