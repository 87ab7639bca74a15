variable "region" {
  description = "AWS region for the bucket and the spot instances."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Globally unique name of the checkpoint bucket."
  type        = string
}

variable "run_prefix" {
  description = "Key prefix of this training run, e.g. \"runs/resnet50\"."
  type        = string
  default     = "runs/example"
}

variable "kms_key_arn" {
  description = "KMS key ARN for SSE-KMS; null keeps SSE-S3."
  type        = string
  default     = null
}

variable "eks_oidc_provider_arn" {
  description = "IAM OIDC provider of an EKS cluster for IRSA (infra/kubernetes/train-job-eks.yaml); null for EC2 only."
  type        = string
  default     = null
}

variable "github_oidc_provider_arn" {
  description = "IAM OIDC provider for GitHub Actions; set it with github_repository to create the CI restore role."
  type        = string
  default     = null
}

variable "github_repository" {
  description = "\"org/repo\" whose main branch may restore checkpoints in CI."
  type        = string
  default     = "example-org/example-repo"
}

variable "ami_id" {
  description = "AMI for the spot training instances (e.g. an AWS Deep Learning AMI with NVIDIA drivers)."
  type        = string
}

variable "instance_type" {
  description = "GPU instance type for training."
  type        = string
  default     = "g5.xlarge"
}

variable "train_command" {
  description = "Training command run by the user-data after the restore (reads CLOUDCKPT_RESUME_DIR)."
  type        = string
  default     = "python -m train"
}

variable "train_package" {
  description = "pip requirement that installs the training code on the instance (empty: none)."
  type        = string
  default     = ""
}

variable "cloudckpt_repo_url" {
  description = "https:// git URL of the cloudckpt repository the VM installs from (there is no PyPI release: never the bare name)."
  type        = string

  validation {
    condition     = startswith(var.cloudckpt_repo_url, "https://")
    error_message = "cloudckpt_repo_url must be an https:// git URL."
  }
}

variable "cloudckpt_ref" {
  description = "The cloudckpt commit to install: a full 40-hex commit sha (a branch or tag can move)."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{40}$", var.cloudckpt_ref))
    error_message = "cloudckpt_ref must be a full commit sha (40 lowercase hex digits)."
  }
}
