defmodule Ottla.Admin do
  @moduledoc false
  # Metadata lookups the library makes for itself, on the clients of a connection or of
  # endpoints (see Ottla.Connection.clients!/1).

  alias Ottla.{Connection, Native, Reply}

  @doc "The partition count of `topic`: `{:ok, count}` or `{:error, %Ottla.Error{}}`."
  @spec partition_count(Ottla.target(), String.t(), pos_integer) ::
          {:ok, pos_integer} | {:error, Ottla.Error.t()}
  def partition_count(target, topic, timeout) do
    clients = Connection.clients!(target)
    Reply.await(&Native.admin_partition_count(&1, &2, clients, topic, timeout), timeout)
  end

  @doc """
  The leader (broker id) of each partition of `topic`: `{:ok, [{partition, broker_id}]}`
  (`-1` when a partition has none), or `{:error, %Ottla.Error{}}`.
  """
  @spec partition_leaders(Ottla.target(), String.t(), pos_integer) ::
          {:ok, [{non_neg_integer, integer}]} | {:error, Ottla.Error.t()}
  def partition_leaders(target, topic, timeout) do
    clients = Connection.clients!(target)
    Reply.await(&Native.admin_partition_leaders(&1, &2, clients, topic, timeout), timeout)
  end
end
