variable "name" {
  description = "Prefix of the managed identities' names (<name>-train, <name>-ci)."
  type        = string
}

variable "resource_group_name" {
  description = "Resource group that holds the managed identities."
  type        = string
}

variable "location" {
  description = "Azure region of the managed identities."
  type        = string
}

variable "container_id" {
  description = "Resource manager id of the checkpoint container (modules/azure-storage output container_id): the only scope granted."
  type        = string
}

variable "aks_oidc_issuer_url" {
  description = "OIDC issuer URL of the AKS cluster (oidc_issuer_url of azurerm_kubernetes_cluster); null when no AKS pods train."
  type        = string
  default     = null
}

variable "aks_service_accounts" {
  description = "Kubernetes service accounts (\"namespace/name\") that act as the training identity. Default none."
  type        = list(string)
  default     = []
}

variable "ci_oidc_issuer_url" {
  description = "OIDC issuer of the CI system. Default GitHub Actions (https://token.actions.githubusercontent.com)."
  type        = string
  default     = "https://token.actions.githubusercontent.com"
}

variable "ci_subjects" {
  description = "CI token subjects that act as the read-only restore identity, by a short name (e.g. {main = \"repo:org/repo:ref:refs/heads/main\"})."
  type        = map(string)
  default     = {}
}

variable "tags" {
  description = "Tags added to the managed identities."
  type        = map(string)
  default     = {}
}
