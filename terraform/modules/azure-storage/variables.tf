variable "resource_group_name" {
  description = "Resource group that holds the storage account."
  type        = string
}

variable "location" {
  description = "Azure region: near the training machines (e.g. \"westeurope\") to avoid egress and latency."
  type        = string
}

variable "account_name" {
  description = "Storage account name: 3-24 lowercase letters and digits, globally unique."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]{3,24}$", var.account_name))
    error_message = "account_name must be 3-24 lowercase letters and digits."
  }
}

variable "container_name" {
  description = "Blob container that holds cloudckpt runs (az://<container>/<run prefix>)."
  type        = string
  default     = "checkpoints"
}

variable "replication_type" {
  description = "Replication: LRS, ZRS, GRS, RAGRS, GZRS or RAGZRS. Default ZRS (survives a zone outage; checkpoints are regenerable)."
  type        = string
  default     = "ZRS"
}

variable "soft_delete_retention_days" {
  description = "Days deleted blobs and containers stay recoverable (undo window for prune/gc). Default 7."
  type        = number
  default     = 7
}

variable "noncurrent_version_expiration_days" {
  description = "Days a previous blob version is kept before the lifecycle rule deletes it. Default 7."
  type        = number
  default     = 7
}

variable "public_network_access_enabled" {
  description = "Allow access over public endpoints from the allowed IP ranges / subnets (network_rules deny everything else). Default true."
  type        = bool
  default     = true
}

variable "allowed_ip_ranges" {
  description = "Public IP ranges (CIDR) allowed through the account firewall, e.g. CI runners. Default none."
  type        = list(string)
  default     = []
}

variable "allowed_subnet_ids" {
  description = "Subnet ids (with the Microsoft.Storage service endpoint) allowed through the firewall, e.g. the AKS node subnet."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags added to the storage account."
  type        = map(string)
  default     = {}
}
