defmodule Ottla.Admin do
  @moduledoc false
  # Metadata lookups the library makes for itself.

  alias Ottla.{Native, Reply}

  @doc "The partition count of `topic`: `{:ok, count}` or `{:error, %Ottla.Error{}}`."
  @spec partition_count(String.t(), [{String.t(), String.t()}], String.t(), pos_integer) ::
          {:ok, pos_integer} | {:error, Ottla.Error.t()}
  def partition_count(bootstrap, config, topic, timeout) do
    Reply.await(
      &Native.admin_partition_count(&1, &2, bootstrap, config, topic, timeout),
      timeout
    )
  end

  @doc """
  The leader (broker id) of each partition of `topic`: `{:ok, [{partition, broker_id}]}`
  (`-1` when a partition has none), or `{:error, %Ottla.Error{}}`.
  """
  @spec partition_leaders(String.t(), [{String.t(), String.t()}], String.t(), pos_integer) ::
          {:ok, [{non_neg_integer, integer}]} | {:error, Ottla.Error.t()}
  def partition_leaders(bootstrap, config, topic, timeout) do
    Reply.await(
      &Native.admin_partition_leaders(&1, &2, bootstrap, config, topic, timeout),
      timeout
    )
  end
end
