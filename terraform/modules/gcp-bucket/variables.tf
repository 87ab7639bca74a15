variable "project_id" {
  description = "GCP project that owns the bucket."
  type        = string
}

variable "bucket_name" {
  description = "Name of the GCS bucket that holds cloudckpt runs (globally unique)."
  type        = string
}

variable "location" {
  description = "Bucket location: a region near the training machines (e.g. \"us-central1\") avoids egress and inter-region latency."
  type        = string
}

variable "storage_class" {
  description = "Storage class. Default STANDARD (checkpoints are rewritten often; colder classes charge early-deletion fees)."
  type        = string
  default     = "STANDARD"
}

variable "versioning" {
  description = "Keep noncurrent object generations (undo window for prune/gc). Default true; with false, soft delete is the only undo."
  type        = bool
  default     = true
}

variable "noncurrent_version_expiration_days" {
  description = "Days a noncurrent generation is kept before lifecycle deletes it (versioning only). Default 7."
  type        = number
  default     = 7
}

variable "soft_delete_retention_seconds" {
  description = "Soft-delete retention in seconds (0 turns soft delete off; otherwise 604800 to 7776000). Default 604800 (7 days)."
  type        = number
  default     = 604800

  validation {
    condition     = var.soft_delete_retention_seconds == 0 || (var.soft_delete_retention_seconds >= 604800 && var.soft_delete_retention_seconds <= 7776000)
    error_message = "soft_delete_retention_seconds must be 0 or between 604800 (7 days) and 7776000 (90 days)."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which unfinished XML-API multipart uploads are aborted. Default 1."
  type        = number
  default     = 1
}

variable "kms_key_name" {
  description = "Cloud KMS key for CMEK default encryption; null (default) uses Google-managed encryption."
  type        = string
  default     = null
}

variable "access_log_bucket" {
  description = "Name of an existing bucket that receives usage logs; null (default) turns usage logging off (Cloud Audit Logs still apply)."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds checkpoints. Default false."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels added to the bucket."
  type        = map(string)
  default     = {}
}
