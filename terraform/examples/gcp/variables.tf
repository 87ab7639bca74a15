variable "project_id" {
  description = "GCP project for the bucket, service accounts and VMs."
  type        = string
}

variable "region" {
  description = "Region of the bucket and the spot VMs."
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "Globally unique name of the checkpoint bucket."
  type        = string
}

variable "run_prefix" {
  description = "Object prefix of this training run, e.g. \"runs/resnet50\"."
  type        = string
  default     = "runs/example"
}

variable "gke_service_accounts" {
  description = "\"namespace/name\" of GKE service accounts that train (infra/kubernetes/train-job-gke.yaml)."
  type        = list(string)
  default     = ["training/cloudckpt-train"]
}

variable "ci_principals" {
  description = "Workload Identity Federation principals (e.g. one GitHub repository's principalSet) that may restore in CI."
  type        = list(string)
  default     = []
}

variable "subnetwork" {
  description = "Subnetwork for the spot VMs (they get no external IP: give the subnet Private Google Access or Cloud NAT)."
  type        = string
}

variable "machine_type" {
  description = "Machine type of the spot training VM."
  type        = string
  default     = "g2-standard-4"
}

variable "gpu_type" {
  description = "Accelerator type attached to each VM."
  type        = string
  default     = "nvidia-l4"
}

variable "image" {
  description = "Boot image with NVIDIA drivers, e.g. a Deep Learning VM image."
  type        = string
  default     = "projects/deeplearning-platform-release/global/images/family/common-cu123-debian-11-py310"
}

variable "train_command" {
  description = "Training command run by the startup script after the restore (reads CLOUDCKPT_RESUME_DIR)."
  type        = string
  default     = "python -m train"
}

variable "train_package" {
  description = "pip requirement that installs the training code on the VM (empty: none)."
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
