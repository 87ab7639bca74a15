variable "bucket_name" {
  description = "Name of the S3 bucket that holds cloudckpt runs (globally unique, 3-63 characters)."
  type        = string

  validation {
    condition     = length(var.bucket_name) >= 3 && length(var.bucket_name) <= 63
    error_message = "S3 bucket names have 3 to 63 characters."
  }
}

variable "kms_key_arn" {
  description = "ARN of a KMS key for SSE-KMS. null (default) keeps SSE-S3 (AES256), which needs no key policy."
  type        = string
  default     = null
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted object version is kept before it expires (undo window for prune/gc)."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which unfinished multipart uploads (from preempted or crashed pushes) are aborted."
  type        = number
  default     = 1
}

variable "access_log_bucket" {
  description = "Name of an existing bucket that receives S3 server access logs; null (default) turns access logging off."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds checkpoints. Default false."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to the bucket."
  type        = map(string)
  default     = {}
}
