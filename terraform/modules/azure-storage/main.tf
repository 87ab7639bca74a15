# A storage account and a private container for cloudckpt runs: Entra ID (RBAC) only - no shared keys, no anonymous
# access - TLS 1.2 over HTTPS only, reachable from the listed networks only, blob versioning and soft delete as the
# undo window for prune/gc, infrastructure encryption, and a lifecycle rule that expires old versions.
#
# cloudckpt needs no more than the Blob service's own conditional writes (If-Match / If-None-Match on the index);
# staged blocks that were never committed (a killed upload) are discarded by the service after 7 days.

resource "azurerm_storage_account" "this" {
  name                              = var.account_name
  resource_group_name               = var.resource_group_name
  location                          = var.location
  account_kind                      = "StorageV2"
  account_tier                      = "Standard"
  account_replication_type          = var.replication_type
  min_tls_version                   = "TLS1_2"
  https_traffic_only_enabled        = true
  shared_access_key_enabled         = false
  default_to_oauth_authentication   = true
  allow_nested_items_to_be_public   = false
  public_network_access_enabled     = var.public_network_access_enabled
  infrastructure_encryption_enabled = true
  tags                              = var.tags

  blob_properties {
    versioning_enabled = true

    delete_retention_policy {
      days = var.soft_delete_retention_days
    }

    container_delete_retention_policy {
      days = var.soft_delete_retention_days
    }
  }

  network_rules {
    default_action             = "Deny"
    bypass                     = ["AzureServices", "Logging", "Metrics"]
    ip_rules                   = var.allowed_ip_ranges
    virtual_network_subnet_ids = var.allowed_subnet_ids
  }

  sas_policy {
    expiration_period = "01.00:00:00"
    expiration_action = "Log"
  }

  #checkov:skip=CKV_AZURE_33:The account serves blobs only: no queue is created, so there is no queue traffic to log
  #checkov:skip=CKV2_AZURE_1:Customer-managed keys are an organisation choice; Microsoft-managed keys plus infrastructure encryption (double encryption) by default
  #checkov:skip=CKV2_AZURE_33:Private endpoints depend on the caller's network; access is limited by network_rules (default Deny) instead
  #checkov:skip=CKV_AZURE_206:Replication is the caller's choice (var.replication_type); checkpoints are regenerable and ZRS/GRS cost more
  #checkov:skip=CKV_AZURE_59:The public endpoint admits only allowed_ip_ranges and allowed_subnet_ids (network_rules default Deny); set public_network_access_enabled = false with a private endpoint
}

resource "azurerm_storage_container" "this" {
  name                  = var.container_name
  storage_account_id    = azurerm_storage_account.this.id
  container_access_type = "private"

  #checkov:skip=CKV2_AZURE_21:Blob read logging goes through diagnostic settings to the caller's Log Analytics workspace, outside this module
}

resource "azurerm_storage_management_policy" "this" {
  storage_account_id = azurerm_storage_account.this.id

  rule {
    name    = "cloudckpt-expire-old-versions"
    enabled = true
    filters {
      blob_types   = ["blockBlob"]
      prefix_match = ["${var.container_name}/"]
    }
    actions {
      version {
        delete_after_days_since_creation = var.noncurrent_version_expiration_days
      }
    }
  }
}
