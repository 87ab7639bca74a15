variable "project_id" {
  description = "GCP project for the service accounts."
  type        = string
}

variable "name" {
  description = "Stem for the service account ids (6-24 characters, lower case, e.g. \"ckpt-resnet\"); \"-train\" and \"-ci\" are appended."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,23}$", var.name))
    error_message = "name must be 5-24 characters: lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "bucket_name" {
  description = "Name of the checkpoint bucket (output bucket_name of the gcp-bucket module)."
  type        = string
}

variable "run_prefix" {
  description = "Object prefix the training service account may write, without leading or trailing slash, e.g. \"runs/resnet50\". The job's CLOUDCKPT_REMOTE is gs://BUCKET/RUN_PREFIX (or a path below it)."
  type        = string

  validation {
    condition     = length(var.run_prefix) > 0 && !startswith(var.run_prefix, "/") && !endswith(var.run_prefix, "/") && !strcontains(var.run_prefix, "\"")
    error_message = "run_prefix must be non-empty, without leading/trailing slash or quotes."
  }
}

variable "restore_prefix" {
  description = "Object prefix the CI restore service account may read; null (default) means the same as run_prefix."
  type        = string
  default     = null
}

variable "gke_service_accounts" {
  description = "Kubernetes service accounts (\"namespace/name\") that may act as the training service account through GKE Workload Identity."
  type        = list(string)
  default     = []
}

variable "ci_principals" {
  description = "IAM principals that may impersonate the CI restore service account, e.g. a Workload Identity Federation principalSet for one GitHub repository."
  type        = list(string)
  default     = []
}
