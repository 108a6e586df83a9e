defmodule Ottla.Producer do
  @moduledoc false
  # The body of Ottla.produce/4: validates and encodes messages, picks partitions, hands the
  # whole batch to the NIF in one call and waits for the one verdict message.

  alias Ottla.{Connection, Native, Options}

  @opts [:partition, :connection, partitioner: :default, timeout: 30_000, config: []]

  @doc """
  Produces through a connection's producer, or, when the connection has none, through a
  short-lived producer with the connection's endpoints and settings (dead letters).
  """
  def produce_for_connection(name, topic, messages, opts) do
    case Connection.lookup(name) do
      %Connection{producer: nil} = conn ->
        produce({:connection_settings, conn}, topic, messages, opts)

      _ ->
        produce(name, topic, messages, opts)
    end
  end

  def produce(target, topic, messages, opts) do
    opts = Options.keyword!(opts, @opts, "Ottla.produce/4 options")
    topic = Options.topic!(topic)
    timeout = Options.timeout!(opts[:timeout], :timeout)
    partition = opts[:partition] && Options.integer!(opts[:partition], :partition, 0)
    partitioner = partitioner!(opts[:partitioner])
    extra_config = Options.client_config!(opts[:config])
    originals = if is_list(messages), do: messages, else: [messages]
    encoded = Enum.map(originals, &encode!/1)

    {bootstrap, config, conn} =
      case target do
        {:connection_settings, conn} -> {conn.bootstrap, conn.config, nil}
        target -> Connection.resolve!(target)
      end

    cond do
      originals == [] ->
        :ok

      conn != nil and conn.producer == nil ->
        error =
          Ottla.Error.new(
            :no_producer,
            "connection #{inspect(conn.name)} was started without a :producer option"
          )

        whole_call_failed(error, originals)

      conn != nil ->
        send_batch(conn.producer, topic, encoded, originals, partition, partitioner, timeout)

      true ->
        # librdkafka gives every message its verdict within message.timeout.ms: a little
        # less than the call's timeout, so the verdicts are in when the call returns.
        message_timeout = max(timeout - min(div(timeout, 10), 500), 1)

        props =
          Connection.producer_defaults() ++
            config ++
            extra_config ++ [{"message.timeout.ms", Integer.to_string(message_timeout)}]

        case Native.producer_new(bootstrap, props) do
          {:ok, producer} ->
            try do
              send_batch(producer, topic, encoded, originals, partition, partitioner, timeout)
            after
              Native.producer_close(producer, 1_000)
            end

          {:error, error} ->
            whole_call_failed(error, originals)
        end
    end
  end

  defp send_batch(producer, topic, encoded, originals, partition, partitioner, timeout) do
    started = System.monotonic_time(:millisecond)

    case assign_partitions(producer, topic, encoded, partition, partitioner, timeout) do
      {:ok, tuples} ->
        left = max(timeout - (System.monotonic_time(:millisecond) - started), 0)
        tag = System.unique_integer([:positive])
        {:pending, batch} = Native.producer_send(producer, self(), tag, topic, tuples, left)
        await(batch, tag, originals, left)

      {:error, error} ->
        whole_call_failed(error, originals)
    end
  end

  defp await(batch, tag, originals, timeout) do
    receive do
      {:ottla_produced, ^tag, failures} -> verdict(failures, originals)
    after
      timeout ->
        case Native.producer_abandon(batch) do
          :sent ->
            # Every verdict came in as the timeout passed: the message is on its way.
            receive do
              {:ottla_produced, ^tag, failures} -> verdict(failures, originals)
            end

          {:abandoned, failures, unreported} ->
            still_queued =
              Ottla.Error.new(
                :timed_out,
                "no delivery report within #{timeout} ms: the message is still queued and " <>
                  "may yet be delivered",
                true
              )

            still_queued = %{still_queued | possibly_persisted?: true}
            late = Enum.map(unreported, &{&1, still_queued})
            verdict(Enum.sort(failures ++ late), originals)
        end
    end
  end

  # The call could not be made at all: every message failed with the same error.
  defp whole_call_failed(error, originals),
    do: {:error, error, Enum.map(originals, &{&1, error})}

  defp verdict([], _originals), do: :ok

  defp verdict(failures, originals) do
    by_index = List.to_tuple(originals)
    failed = Enum.map(failures, fn {index, error} -> {elem(by_index, index), error} end)
    [{_, first} | _] = failed

    summary =
      Ottla.Error.new(
        first.code,
        "#{length(failed)} of #{tuple_size(by_index)} messages were not delivered; first: #{first.message}",
        Enum.all?(failed, fn {_, e} -> e.retriable? end)
      )

    {:error,
     %{summary | possibly_persisted?: Enum.any?(failed, fn {_, e} -> e.possibly_persisted? end)},
     failed}
  end

  defp assign_partitions(_producer, _topic, encoded, partition, _partitioner, _timeout)
       when is_integer(partition) do
    {:ok, Enum.map(encoded, &put_elem(&1, 4, partition))}
  end

  defp assign_partitions(_producer, _topic, encoded, nil, :default, _timeout), do: {:ok, encoded}

  defp assign_partitions(producer, topic, encoded, nil, partitioner, timeout) do
    with {:ok, count} <-
           Ottla.Reply.await(
             &Native.producer_partition_count(&1, &2, producer, topic, timeout),
             timeout
           ) do
      {:ok, Enum.map(encoded, &put_elem(&1, 4, pick(partitioner, count, elem(&1, 0))))}
    end
  end

  defp pick(:random, count, _key), do: :rand.uniform(count) - 1
  # Elsa's md5 partitioner, so keys keep their partitions when moving from Elsa.
  defp pick(:md5, count, key),
    do: :crypto.hash(:md5, key || "") |> :binary.bin_to_list() |> Enum.sum() |> rem(count)

  defp pick(fun, count, key) do
    case fun.(count, key) do
      p when is_integer(p) and p >= 0 and p < count ->
        p

      other ->
        raise ArgumentError,
              "the :partitioner function returned #{inspect(other)} for key #{inspect(key)}; " <>
                "expected an integer from 0 to #{count - 1}"
    end
  end

  defp partitioner!(p) when p in [:default, :random, :md5], do: p
  defp partitioner!(fun) when is_function(fun, 2), do: fun

  defp partitioner!(other) do
    raise ArgumentError,
          "invalid :partitioner #{inspect(other)}: expected :default, :random, :md5 or a " <>
            "function (partition_count, key) -> partition"
  end

  # {key, value, headers, timestamp, partition}; partition -1 lets librdkafka choose.
  defp encode!(value) when is_binary(value), do: {nil, value, [], nil, -1}

  defp encode!({key, value})
       when (is_binary(key) or is_nil(key)) and (is_binary(value) or is_nil(value)),
       do: {key, value, [], nil, -1}

  defp encode!(%{value: value} = message) when is_binary(value) or is_nil(value) do
    key = Map.get(message, :key)
    timestamp = Map.get(message, :timestamp)

    unless is_binary(key) or is_nil(key), do: bad_message!(message, "its :key is not a binary")

    unless is_nil(timestamp) or (is_integer(timestamp) and timestamp >= 0),
      do: bad_message!(message, "its :timestamp is not a non-negative integer (ms)")

    {key, value, headers!(Map.get(message, :headers) || [], message), timestamp, -1}
  end

  defp encode!(other),
    do:
      bad_message!(
        other,
        "expected a binary, {key, value} or %{key: k, value: v, headers: [...]}"
      )

  defp headers!(headers, message) when is_list(headers) do
    Enum.map(headers, fn
      {name, value}
      when (is_binary(name) or is_atom(name)) and (is_binary(value) or is_nil(value)) ->
        {to_string(name), value}

      _ ->
        bad_message!(message, "its :headers must be a list of {name, binary} pairs")
    end)
  end

  defp headers!(_headers, message), do: bad_message!(message, "its :headers must be a list")

  defp bad_message!(message, why),
    do: raise(ArgumentError, "invalid message in messages #{inspect(message, limit: 5)}: #{why}")
end
