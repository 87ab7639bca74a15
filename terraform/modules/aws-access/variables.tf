variable "name" {
  description = "Name stem for the IAM policies and roles this module creates (e.g. \"cloudckpt-myrun\")."
  type        = string
}

variable "bucket_arn" {
  description = "ARN of the checkpoint bucket (output bucket_arn of the aws-bucket module)."
  type        = string
}

variable "run_prefix" {
  description = "Key prefix the training job may write, without leading or trailing slash, e.g. \"runs/resnet50\". The job's CLOUDCKPT_REMOTE is s3://BUCKET/RUN_PREFIX (or a path below it)."
  type        = string

  validation {
    condition     = length(var.run_prefix) > 0 && !startswith(var.run_prefix, "/") && !endswith(var.run_prefix, "/") && !strcontains(var.run_prefix, "*")
    error_message = "run_prefix must be non-empty, without leading/trailing slash and without wildcards."
  }
}

variable "restore_prefix" {
  description = "Key prefix the CI restore identity may read and list; null (default) means the same as run_prefix."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "KMS key of an SSE-KMS bucket; when set, the training policy may use it to encrypt and decrypt and the restore policy to decrypt. null for SSE-S3."
  type        = string
  default     = null
}

variable "ec2_instance_profile" {
  description = "Create an EC2 instance profile for the training role (spot instances from a launch template). Default true."
  type        = bool
  default     = true
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider, for IRSA; null (default) disables the EKS trust."
  type        = string
  default     = null
}

variable "eks_service_accounts" {
  description = "Kubernetes service accounts (\"namespace:name\") allowed to assume the training role through IRSA."
  type        = list(string)
  default     = []
}

variable "ci_oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider of a CI system (token.actions.githubusercontent.com for GitHub Actions, gitlab.com for GitLab); set it with ci_oidc_subjects to create a read-only CI restore role. null (default): no CI role, attach restore_policy_arn yourself."
  type        = string
  default     = null
}

variable "ci_oidc_subjects" {
  description = "OIDC subjects allowed to assume the CI restore role, e.g. [\"repo:org/repo:ref:refs/heads/main\"] (GitHub) or [\"project_path:group/project:ref_type:branch:ref:main\"] (GitLab). Wildcards are allowed but should stay within one repository."
  type        = list(string)
  default     = []
}

variable "ci_oidc_audience" {
  description = "Audience the CI's OIDC token carries. Default \"sts.amazonaws.com\" (GitHub's configure-aws-credentials; set the same aud in GitLab id_tokens)."
  type        = string
  default     = "sts.amazonaws.com"
}

variable "max_session_duration" {
  description = "Maximum session length in seconds for the roles. Default 3600."
  type        = number
  default     = 3600
}

variable "tags" {
  description = "Tags added to the roles and policies."
  type        = map(string)
  default     = {}
}
